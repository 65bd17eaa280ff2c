//! The shipped default spam rules, aimed at mail sent from compromised
//! accounts.
//!
//! A false positive counts a strike against a legitimate user and can lock
//! the mailbox, so the set is conservative. The default threshold is 5.0 and
//! no rule scores above 3.0, so one signal alone never makes a message spam.
//! Weak signals (missing or unusual headers, old dates, odd encodings, the
//! client's host name) are left out entirely. A message becomes spam through
//! a combination of real spam signals, such as a credential-phishing phrase
//! plus an executable attachment, a raw-IP link, a URL shortener or 50
//! recipients.
//!
//! The rules use the `[[scan.spam.rules]]` format, so an operator rule with
//! the same name replaces one of them (a score of 0 turns it off).
//! Body patterns avoid `\b`: a Unicode word boundary makes the regex crate
//! fall back to a slower engine on non-ASCII text.

use serde::Deserialize;

use super::config::RuleConfig;

/// The default rules as TOML, one `[[rules]]` table per rule.
pub const DEFAULT_RULES_TOML: &str = r##"
# Script types that Windows runs on a double click and that have little
# legitimate use in mail: screen savers, program information files, Control
# Panel items, HTML applications, Windows Script Host files and shortcuts.
# Score 3.0: the strongest attachment signal, still below the threshold alone.
[[rules]]
name = "SCRIPT_ATTACHMENT"
score = 3.0
attachment_type = ["scr", "pif", "cpl", "hta", "vbs", "vbe", "jse", "wsf", "wsh", "lnk"]

# Programs, installers, shell scripts, Java archives and disk images.
# Administrators and developers send these too, so the score is 2.0: it needs
# a strong second signal (3.0) to reach the threshold.
[[rules]]
name = "EXECUTABLE_ATTACHMENT"
score = 2.0
attachment_type = ["exe", "msi", "bat", "cmd", "ps1", "js", "jar", "iso", "img", "vhd"]

# Credential phishing: asking the reader to verify an account or mailbox, or
# claiming that the account is about to be suspended. Score 3.0: a strong
# signal, but services send account confirmations legitimately.
[[rules]]
name = "PHISH_VERIFY_ACCOUNT"
score = 3.0
body = '''(?ix)
    (?:verify|validate|confirm) \s+ your \s+
    (?:(?:e-?mail|mailbox|webmail|bank|banking) \s+)?
    (?:account|mailbox|identity|login \s+ details|credentials)
  | your \s+ (?:(?:e-?mail|mailbox|bank) \s+)? account \s+
    (?:has \s+ been|will \s+ be|is \s+ being) \s+
    (?:suspended|locked|disabled|deactivated|closed|terminated|blocked)
'''

# Password-expiry notices, a common phishing lure. IT departments send real
# ones, often with a link to an internal server, so the score is 2.0: with a
# raw-IP link (2.0) it stays below the threshold.
[[rules]]
name = "PHISH_PASSWORD_EXPIRY"
score = 2.0
body = '''(?ix)
    your \s+ (?:(?:e-?mail|account|mailbox|network|domain) \s+)? password \s+
    (?:expires|will \s+ expire|has \s+ expired|is \s+ expiring|is \s+ about \s+ to \s+ expire)
'''

# A link whose host is an IP address instead of a domain name, typical of
# phishing kits on hijacked servers. Links to intranet servers match too, so
# the score is 2.0.
[[rules]]
name = "URL_RAW_IP"
score = 2.0
body = '''(?ix)
    https?://
    (?:[^\s/?\x23@<>"']+ @)?
    (?: [0-9]{1,3} (?:\.[0-9]{1,3}){3} | \[ [0-9a-f:.]+ \] )
    (?: [:/?\x23<>"'),;\s] | \.(?:\s|$) | $ )
'''

# Well-known URL shorteners, which hide the real link target. People share
# such links in ordinary mail too, so the score is 2.0.
[[rules]]
name = "URL_SHORTENER"
score = 2.0
url_host = [
    "bit.ly", "tinyurl.com", "goo.gl", "ow.ly", "is.gd", "v.gd", "buff.ly",
    "cutt.ly", "rebrand.ly", "rb.gy", "shorturl.at", "tiny.cc", "t.ly", "s.id",
]

# Advance-fee fraud: inheritance and consignment funds, transfers "into your
# account", and offers to present the reader as the next of kin or
# beneficiary. Score 3.0.
[[rules]]
name = "ADVANCE_FEE"
score = 3.0
body = '''(?ix)
    as \s+ (?:the \s+)? (?:next \s+ of \s+ kin|beneficiary) \s+ (?:to|of)
  | (?:inheritance|consignment|unclaimed) \s+ (?:funds?|box|sum|fortune)
  | (?:transfer|release|remit) \s+ (?:of \s+)? (?:the \s+)? (?:funds?|inheritance|money) \s+
    (?:to|into) \s+ your \s+ (?:bank \s+)? account
  | (?:my|our) \s+ (?:late|deceased) \s+ (?:client|customer)
'''

# Advance-fee subjects. Score 1.5: subjects are short and ambiguous, so this
# only adds weight to the body rules.
[[rules]]
name = "SUBJECT_ADVANCE_FEE"
score = 1.5
header = "Subject"
pattern = '''(?i)urgent\s+(?:business\s+)?(?:proposal|assistance)|donation\s+(?:for|to)\s+you|(?:inheritance|unclaimed)\s+(?:funds?|claim)|beneficiary\s+(?:claim|payment|notification)'''

# Gift-card fraud from a hijacked colleague's account: "buy some Google Play
# gift cards", "scratch off the back", "send me the codes". Score 3.0.
[[rules]]
name = "GIFT_CARD_REQUEST"
score = 3.0
body = '''(?ix)
    (?:buy|purchase|get|pick \s+ up) \s+ (?:me \s+)? (?:some|a \s+ few|several|[0-9]+) \s+
    (?:(?:itunes|apple|google \s+ play|amazon|steam|ebay|visa|vanilla|target|walmart) \s+)?
    gift \s* cards?
  | scratch \s+ (?:off \s+)? the \s+ (?:back|silver|card|code)
  | (?:send|email|text) \s+ me \s+ (?:the \s+)? (?:gift \s+)? card \s+ (?:codes|numbers|pictures|photos)
'''

# Demands for payment in cryptocurrency (sextortion, fake invoices) and
# wallet addresses. Score 3.0.
[[rules]]
name = "CRYPTO_PAYMENT"
score = 3.0
body = '''(?ix)
    (?:send|pay|transfer|deposit) \s+ (?:\S+ \s+){0,6}? (?:in|to|via|using) \s+
    (?:bitcoin|btc|ethereum|usdt|monero|xmr)
  | (?:send|pay|transfer|deposit) \s+ [0-9.,]+ \s* (?:bitcoin|btc|eth|usdt|xmr)
  | (?:bitcoin|btc|ethereum|usdt|monero) \s+ (?:wallet \s+)? address
'''

# 50 or more envelope recipients in one transaction: hijacked accounts blast
# spam to long lists, but so do ordinary announcements. Score 2.5.
[[rules]]
name = "MANY_RECIPIENTS"
score = 2.5
min_recipients = 50
"##;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DefaultRules {
    rules: Vec<RuleConfig>,
}

/// Parses [`DEFAULT_RULES_TOML`].
pub fn default_rules() -> Result<Vec<RuleConfig>, String> {
    toml::from_str::<DefaultRules>(DEFAULT_RULES_TOML)
        .map(|parsed| parsed.rules)
        .map_err(|error| format!("the built-in default rules do not parse: {error}"))
}

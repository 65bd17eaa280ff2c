//! Browser sessions of the dashboard: a login exchanges the admin or
//! support token for a session cookie, and every state-changing request
//! made with that cookie must carry the session's CSRF token in a header.
//!
//! Sessions live in memory only, so a restart logs every browser out. A
//! session also ends when a reload changes or removes the token it was
//! started with.

use super::{ApiError, Credentials, Role, constant_time_eq, sha256};
use axum::http::{HeaderMap, Method, StatusCode, header};
use rand::RngCore;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Name of the session cookie.
pub const COOKIE: &str = "sendguard_session";

/// Header that carries the CSRF token of a cookie request that changes
/// state.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// A session ends this long after its login, whatever its use.
pub const MAX_AGE: Duration = Duration::from_secs(8 * 3600);

/// A session ends after this long without a request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Maximum number of sessions kept. A login beyond it ends the oldest one.
const MAX_SESSIONS: usize = 256;

/// Failed logins allowed from one client address per [`FAILURE_WINDOW`].
/// Later logins from that address get 429 until the window ends.
// NOTE: behind a reverse proxy every client has the proxy's address, so
// one client's failures also delay the others' logins (not bearer tokens).
pub const MAX_FAILURES: u32 = 10;

/// Length of the window in which failed logins are counted.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Maximum number of client addresses whose failures are kept. Beyond it,
/// the ended windows are dropped first, then all of them.
const MAX_TRACKED_CLIENTS: usize = 4096;

/// One logged-in browser.
#[derive(Debug, Clone)]
struct Session {
    role: Role,
    /// SHA-256 of the token the session was started with, so that the
    /// session ends when a reload replaces or removes that token.
    token_hash: [u8; 32],
    csrf: String,
    created: Instant,
    last_used: Instant,
}

/// A live session's role, CSRF token and remaining time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub role: Role,
    pub csrf: String,
    /// Time left until the session ends at the latest.
    pub remaining: Duration,
}

/// The failed logins of one client address in the current window.
#[derive(Debug, Clone, Copy)]
struct Failures {
    window_start: Instant,
    count: u32,
}

/// The sessions of this process and the failed-login counts.
#[derive(Debug, Default)]
pub struct Sessions {
    /// Sessions by the SHA-256 of their cookie value, so a memory dump
    /// does not hold usable cookies.
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

/// Returns 32 random bytes as 64 hexadecimal characters.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

impl Sessions {
    /// Starts a session for `role`, logged in with the token whose SHA-256
    /// is `token_hash`, and returns its cookie value and info.
    pub fn create(&self, role: Role, token_hash: [u8; 32], now: Instant) -> (String, SessionInfo) {
        let id = random_token();
        let session = Session {
            role,
            token_hash,
            csrf: random_token(),
            created: now,
            last_used: now,
        };
        let info = SessionInfo {
            role,
            csrf: session.csrf.clone(),
            remaining: MAX_AGE,
        };
        let mut sessions = self.sessions.lock().expect("sessions lock");
        sessions.retain(|_, session| is_live(session, now));
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, session)| session.created)
                .map(|(key, _)| *key)
        {
            sessions.remove(&oldest);
        }
        sessions.insert(sha256(&id), session);
        (id, info)
    }

    /// Returns the live session of cookie value `id` and marks it used. A
    /// session whose token no longer has its role in `credentials` (the
    /// token was replaced or removed by a reload) is ended.
    pub fn lookup(&self, id: &str, credentials: &Credentials, now: Instant) -> Option<SessionInfo> {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let key = sha256(id);
        let session = sessions.get_mut(&key)?;
        if credentials.role_of_hash(&session.token_hash) != Some(session.role) {
            tracing::info!(
                role = ?session.role,
                "dashboard session ended: its token is no longer configured"
            );
            sessions.remove(&key);
            return None;
        }
        if !is_live(session, now) {
            sessions.remove(&key);
            return None;
        }
        session.last_used = now;
        Some(SessionInfo {
            role: session.role,
            csrf: session.csrf.clone(),
            remaining: MAX_AGE.saturating_sub(now.duration_since(session.created)),
        })
    }

    /// Ends the session of cookie value `id`.
    pub fn remove(&self, id: &str) {
        self.sessions
            .lock()
            .expect("sessions lock")
            .remove(&sha256(id));
    }

    /// Returns how long `client` must wait before its next login attempt,
    /// or `None` when it may try now.
    pub fn login_wait(&self, client: IpAddr, now: Instant) -> Option<Duration> {
        let failures = self.failures.lock().expect("failures lock");
        let entry = failures.get(&client)?;
        let elapsed = now.duration_since(entry.window_start);
        (elapsed < FAILURE_WINDOW && entry.count >= MAX_FAILURES).then(|| FAILURE_WINDOW - elapsed)
    }

    /// Counts a failed login of `client`.
    pub fn record_failure(&self, client: IpAddr, now: Instant) {
        let mut failures = self.failures.lock().expect("failures lock");
        if failures.len() >= MAX_TRACKED_CLIENTS {
            failures.retain(|_, entry| now.duration_since(entry.window_start) < FAILURE_WINDOW);
        }
        if failures.len() >= MAX_TRACKED_CLIENTS {
            failures.clear();
        }
        let entry = failures.entry(client).or_insert(Failures {
            window_start: now,
            count: 0,
        });
        if now.duration_since(entry.window_start) >= FAILURE_WINDOW {
            *entry = Failures {
                window_start: now,
                count: 0,
            };
        }
        entry.count = entry.count.saturating_add(1);
    }
}

fn is_live(session: &Session, now: Instant) -> bool {
    now.duration_since(session.created) < MAX_AGE
        && now.duration_since(session.last_used) < IDLE_TIMEOUT
}

/// Returns the value of the session cookie in a request, if any.
pub fn cookie_value(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|text| text.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
        .filter(|value| !value.is_empty())
}

/// Returns whether a method changes state and so needs the CSRF header.
pub fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Checks the CSRF header of a cookie request that changes state.
///
/// # Errors
/// 403 when the header is missing or differs from the session's token.
pub fn check_csrf(headers: &HeaderMap, session: &SessionInfo) -> Result<(), ApiError> {
    let presented = headers
        .get(CSRF_HEADER)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    if presented.is_empty() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "missing {CSRF_HEADER} header: a request made with the session cookie that \
                 changes state must carry the session's CSRF token (GET /api/v1/session returns it)"
            ),
        ));
    }
    // Comparing hashes in constant time leaks nothing about the token.
    if !constant_time_eq(&sha256(presented), &sha256(&session.csrf)) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "invalid {CSRF_HEADER} header: it is not this session's CSRF token; reload the \
                 dashboard to get the current one"
            ),
        ));
    }
    Ok(())
}

/// Builds the `Set-Cookie` value that stores session `id`; `secure` adds
/// the `Secure` attribute.
pub fn set_cookie(id: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
        MAX_AGE.as_secs()
    )
}

/// Builds the `Set-Cookie` value that deletes the session cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADMIN_TOKEN: &str = "admin-token-0123456789";
    const SUPPORT_TOKEN: &str = "support-token-0123456789";

    fn credentials() -> Credentials {
        Credentials {
            admin: Some(sha256(ADMIN_TOKEN)),
            support: Some(sha256(SUPPORT_TOKEN)),
        }
    }

    #[test]
    fn session_ends_when_idle() {
        let sessions = Sessions::default();
        let start = Instant::now();
        let (id, info) = sessions.create(Role::Support, sha256(SUPPORT_TOKEN), start);
        assert_eq!(info.role, Role::Support);
        let used = sessions.lookup(&id, &credentials(), start + Duration::from_secs(60));
        assert_eq!(used.map(|info| info.role), Some(Role::Support));
        let late = start + Duration::from_secs(60) + IDLE_TIMEOUT;
        assert!(sessions.lookup(&id, &credentials(), late).is_none());
    }

    #[test]
    fn session_ends_at_max_age() {
        let sessions = Sessions::default();
        let start = Instant::now();
        let (id, _) = sessions.create(Role::Admin, sha256(ADMIN_TOKEN), start);
        let mut now = start;
        // Regular use keeps it from going idle, but not past its maximum age.
        while now.duration_since(start) + IDLE_TIMEOUT / 2 < MAX_AGE {
            now += IDLE_TIMEOUT / 2;
            assert!(sessions.lookup(&id, &credentials(), now).is_some());
        }
        assert!(
            sessions
                .lookup(&id, &credentials(), start + MAX_AGE)
                .is_none()
        );
    }

    #[test]
    fn session_ends_when_token_replaced() {
        let sessions = Sessions::default();
        let now = Instant::now();
        let (admin, _) = sessions.create(Role::Admin, sha256(ADMIN_TOKEN), now);
        let (support, _) = sessions.create(Role::Support, sha256(SUPPORT_TOKEN), now);
        // A reload replaced the admin token and removed the support hash.
        let reloaded = Credentials {
            admin: Some(sha256("new-admin-token-0123456789")),
            support: None,
        };
        assert!(sessions.lookup(&admin, &reloaded, now).is_none());
        assert!(sessions.lookup(&support, &reloaded, now).is_none());
        // The sessions stay ended when the old tokens come back.
        assert!(sessions.lookup(&admin, &credentials(), now).is_none());
        assert!(sessions.lookup(&support, &credentials(), now).is_none());
    }

    #[test]
    fn session_keeps_role_of_its_token() {
        let sessions = Sessions::default();
        let now = Instant::now();
        let (id, _) = sessions.create(Role::Support, sha256(SUPPORT_TOKEN), now);
        // The support token became the admin token: not a support session.
        let swapped = Credentials {
            admin: Some(sha256(SUPPORT_TOKEN)),
            support: None,
        };
        assert!(sessions.lookup(&id, &swapped, now).is_none());
    }

    #[test]
    fn logout_removes_session() {
        let sessions = Sessions::default();
        let now = Instant::now();
        let (id, _) = sessions.create(Role::Admin, sha256(ADMIN_TOKEN), now);
        sessions.remove(&id);
        assert!(sessions.lookup(&id, &credentials(), now).is_none());
        assert!(
            sessions
                .lookup("not-a-session", &credentials(), now)
                .is_none()
        );
    }

    #[test]
    fn failures_limit_logins() {
        let sessions = Sessions::default();
        let client: IpAddr = "192.0.2.7".parse().expect("address");
        let other: IpAddr = "192.0.2.8".parse().expect("address");
        let start = Instant::now();
        for _ in 0..MAX_FAILURES {
            assert_eq!(sessions.login_wait(client, start), None);
            sessions.record_failure(client, start);
        }
        assert_eq!(sessions.login_wait(client, start), Some(FAILURE_WINDOW));
        assert_eq!(sessions.login_wait(other, start), None);
        assert_eq!(sessions.login_wait(client, start + FAILURE_WINDOW), None);
    }

    #[test]
    fn csrf_header_must_match() {
        let session = SessionInfo {
            role: Role::Admin,
            csrf: "a".repeat(64),
            remaining: MAX_AGE,
        };
        let mut headers = HeaderMap::new();
        assert!(check_csrf(&headers, &session).is_err());
        headers.insert(CSRF_HEADER, "b".repeat(64).parse().expect("header"));
        assert!(check_csrf(&headers, &session).is_err());
        headers.insert(CSRF_HEADER, "a".repeat(64).parse().expect("header"));
        assert!(check_csrf(&headers, &session).is_ok());
    }

    #[test]
    fn cookie_attributes() {
        let plain = set_cookie("abc", false);
        assert!(plain.starts_with("sendguard_session=abc;"), "{plain}");
        assert!(plain.contains("HttpOnly"), "{plain}");
        assert!(plain.contains("SameSite=Strict"), "{plain}");
        assert!(plain.contains("Path=/"), "{plain}");
        assert!(!plain.contains("Secure"), "{plain}");
        assert!(set_cookie("abc", true).ends_with("; Secure"));
        assert!(clear_cookie().contains("Max-Age=0"));
    }

    #[test]
    fn cookie_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            "theme=dark; sendguard_session=abc123; x=y"
                .parse()
                .expect("header"),
        );
        assert_eq!(cookie_value(&headers), Some("abc123"));
        headers.insert(
            header::COOKIE,
            "sendguard_session=".parse().expect("header"),
        );
        assert_eq!(cookie_value(&headers), None);
    }
}

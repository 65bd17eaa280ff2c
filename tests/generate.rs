//! `sendguard generate`: the man pages and completion scripts that the
//! Debian package installs cover every command the binary accepts.

use std::collections::BTreeSet;
use std::process::Command;

fn sendguard(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_sendguard"))
        .args(args)
        .output()
        .expect("run sendguard");
    assert!(
        output.status.success(),
        "sendguard {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

/// Returns the subcommands that `--help` of `path` lists, without `help`.
fn listed_subcommands(path: &[&str]) -> Vec<String> {
    let mut args = path.to_vec();
    args.push("--help");
    let help = sendguard(&args);
    let Some((_, commands)) = help.split_once("Commands:\n") else {
        return Vec::new();
    };
    commands
        .lines()
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// Returns every command path below the top, such as ["config", "check"],
/// as `--help` lists them.
fn all_commands() -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut pending: Vec<Vec<String>> = vec![Vec::new()];
    while let Some(path) = pending.pop() {
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        for name in listed_subcommands(&args) {
            let mut child = path.clone();
            child.push(name);
            found.push(child.clone());
            pending.push(child);
        }
    }
    found
}

#[test]
fn man_pages_cover_every_command() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let printed = sendguard(&["generate", "man", dir.path().to_str().expect("utf-8 path")]);
    let commands = all_commands();
    assert!(
        commands.iter().any(|path| path == &["config", "check"]),
        "`--help` should list config check, found {commands:?}"
    );

    let mut expected: BTreeSet<String> = commands
        .iter()
        .map(|path| format!("sendguard-{}.8", path.join("-")))
        .collect();
    expected.insert("sendguard.8".to_string());
    let written: BTreeSet<String> = std::fs::read_dir(dir.path())
        .expect("read the man page directory")
        .map(|entry| {
            entry
                .expect("directory entry")
                .file_name()
                .into_string()
                .expect("utf-8 name")
        })
        .collect();
    assert_eq!(written, expected);
    assert_eq!(
        printed.lines().count(),
        expected.len(),
        "printed paths: {printed}"
    );

    let top = std::fs::read_to_string(dir.path().join("sendguard.8")).expect("read sendguard.8");
    assert!(top.contains(".TH sendguard 8"), "title line missing: {top}");
    for path in commands.iter().filter(|path| path.len() == 1) {
        let reference = format!("sendguard\\-{}(8)", path[0]);
        assert!(
            top.contains(&reference),
            "sendguard.8 does not refer to {reference}"
        );
    }
    assert!(
        top.contains("/etc/sendguard/config.toml"),
        "FILES section missing"
    );
    assert!(top.contains("SIGHUP"), "SIGNALS section missing");
    assert!(
        !top.contains("generate"),
        "sendguard.8 lists the generate command"
    );

    let check = std::fs::read_to_string(dir.path().join("sendguard-config-check.8"))
        .expect("read sendguard-config-check.8");
    assert!(check.contains("Validate a configuration file"), "{check}");
}

/// Returns the top-level commands that a completion script offers, read
/// from the list each generator writes for the first word.
fn offered_commands(shell: &str, script: &str) -> BTreeSet<String> {
    let names: Vec<&str> = match shell {
        // `opts="-h -V --help --version serve check ..."` under `sendguard)`.
        "bash" => script
            .split_once("\n        sendguard)\n")
            .and_then(|(_, rest)| rest.lines().next())
            .and_then(|line| line.trim().strip_prefix("opts=\""))
            .map(|opts| opts.trim_end_matches('"').split_whitespace().collect())
            .unwrap_or_default(),
        // `'serve:Run the SMTP relay' \` lines in `_sendguard_commands()`.
        "zsh" => script
            .split_once("_sendguard_commands() {")
            .and_then(|(_, rest)| rest.split_once("\n    )"))
            .map(|(list, _)| {
                list.lines()
                    .filter_map(|line| line.strip_prefix('\''))
                    .filter_map(|line| line.split(':').next())
                    .collect()
            })
            .unwrap_or_default(),
        // `complete -c sendguard -n "__fish_sendguard_needs_command" -f -a "serve" ...`.
        "fish" => script
            .lines()
            .filter(|line| line.contains("-n \"__fish_sendguard_needs_command\""))
            .filter_map(|line| line.split_once(" -a \""))
            .filter_map(|(_, rest)| rest.split('"').next())
            .collect(),
        _ => panic!("no parser for {shell}"),
    };
    names
        .into_iter()
        .filter(|name| !name.starts_with('-') && *name != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn completions_cover_every_command() {
    let listed: BTreeSet<String> = listed_subcommands(&[]).into_iter().collect();
    assert!(listed.contains("serve"), "{listed:?}");
    assert!(listed.contains("config"), "{listed:?}");

    for shell in ["bash", "zsh", "fish"] {
        let script = sendguard(&["generate", "completions", shell]);
        assert_eq!(
            offered_commands(shell, &script),
            listed,
            "{shell} completion"
        );
    }
}

//! Three relay hosts sharing one policy through a real three-node Redis
//! Cluster on loopback ports.

mod common;

use common::redis::{RedisCluster, wait_until_subscribed};
use common::sendguard::Sendguard;
use common::smtp_client::send_from;
use common::upstream::{Upstream, UpstreamOptions};
use serde_json::Value;

const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

fn spam_message() -> Vec<u8> {
    format!("From: sender@example.org\r\nTo: bob@example.net\r\nSubject: offer\r\n\r\n{GTUBE}\r\n")
        .into_bytes()
}

fn clean_message() -> Vec<u8> {
    b"From: sender@example.org\r\nTo: bob@example.net\r\nSubject: hello\r\n\r\nSee you at lunch.\r\n".to_vec()
}

#[test]
fn cluster_locks_each_mailbox_once_on_every_host() {
    const MAILBOXES: usize = 6;
    const THRESHOLD: usize = 3;
    let cluster = RedisCluster::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let nodes: Vec<String> = cluster
        .urls()
        .iter()
        .map(|url| format!("\"{url}\""))
        .collect();
    let store = format!(
        "backend = \"redis\"\nnodes = [{}]\n[alerts]\nadmin_addresses = [\"admin@example.org\"]\n\
         [policy]\nthreshold = {THRESHOLD}\nwindow = \"10m\"\nfirst_lockout = \"1h\"\n",
        nodes.join(", ")
    );
    let hosts: Vec<Sendguard> = (0..3)
        .map(|_| Sendguard::start(&upstream.address(), &store))
        .collect();
    for host in &hosts {
        wait_until_subscribed(host);
    }

    // The mailboxes' keys hash to different slots, so to different nodes;
    // their strikes go round-robin over the hosts.
    let mut next = 0;
    for mailbox in 0..MAILBOXES {
        for _ in 0..THRESHOLD {
            let host = &hosts[next % hosts.len()];
            next += 1;
            let from = format!("user{mailbox}@example.org");
            let (code, text) = send_from(&host.address, &from, &spam_message());
            assert_eq!(code, 550, "{from}: {text}");
        }
    }
    for mailbox in 0..MAILBOXES {
        let from = format!("user{mailbox}@example.org");
        for (index, host) in hosts.iter().enumerate() {
            let (code, text) = send_from(&host.address, &from, &clean_message());
            assert_eq!(code, 550, "host {index} refuses {from}: {text}");
        }
    }

    let events = hosts[0].wait_for_events(std::time::Duration::from_secs(30), |events| {
        events
            .iter()
            .filter(|event| event["type"] == "action_delivered")
            .count()
            >= MAILBOXES
    });
    let started: Vec<&Value> = events
        .iter()
        .filter(|event| event["type"] == "lockout_started")
        .collect();
    assert_eq!(started.len(), MAILBOXES, "{started:#?}");
    for mailbox in 0..MAILBOXES {
        let from = format!("user{mailbox}@example.org");
        let count = started
            .iter()
            .filter(|event| event["mailbox"] == from.as_str())
            .count();
        assert_eq!(count, 1, "{from}");
    }
    // The mailboxes really spread over the nodes.
    let used = cluster
        .nodes
        .iter()
        .filter(|node| node.cli(&["KEYS", "sendguard:mailbox:*"]).lines().count() > 0)
        .count();
    assert!(used >= 2, "mailbox keys on {used} of 3 nodes");
    // One alert e-mail per lockout reached the upstream.
    let alerts = upstream
        .messages()
        .into_iter()
        .filter(|message| String::from_utf8_lossy(&message.content).contains("Auto-Submitted"))
        .count();
    assert_eq!(alerts, MAILBOXES);
}

//! The pure policy core and identity normalisation, with 1, 10 000 and
//! 1 000 000 tracked mailboxes. A sender check reads the Guard's sender
//! cache, which keeps each mailbox's last lockout. Recording a strike runs
//! on a mailbox's whole state, which the Guard reads from the store.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lru::LruCache;
use sendguard::config::IdentityConfig;
use sendguard::guard::SenderCache;
use sendguard::identity::{MailboxKey, canonical_address};
use sendguard::policy::{MailboxState, Mode, PolicySettings, Strike, Timestamp, check_block};
use std::hint::black_box;
use std::num::NonZeroUsize;

fn tracked(count: usize) -> LruCache<MailboxKey, MailboxState> {
    let mut cache = LruCache::new(NonZeroUsize::new(count).expect("non-zero"));
    let settings = PolicySettings::default();
    for index in 0..count {
        let mut state = MailboxState::default();
        // Every tenth mailbox carries a strike, as a busy relay's would.
        if index % 10 == 0 {
            state.record_strike(
                &settings,
                Strike {
                    at: Timestamp(0),
                    verdict: "spam".into(),
                    message_id: format!("tx-{index}"),
                    header_message_id: None,
                },
            );
        }
        cache.put(
            MailboxKey::mailbox(format!("user{index}@example.org")),
            state,
        );
    }
    cache
}

fn policy(c: &mut Criterion) {
    let settings = PolicySettings::default();
    let mut group = c.benchmark_group("policy");
    for count in [1usize, 10_000, 1_000_000] {
        let mut cache = tracked(count);
        let mut senders = SenderCache::new(NonZeroUsize::new(count).expect("non-zero"));
        for (key, state) in cache.iter() {
            senders.put(key.clone(), state.block.clone());
        }
        let keys: Vec<MailboxKey> = (0..count.min(1024))
            .map(|index| {
                MailboxKey::mailbox(format!(
                    "user{}@example.org",
                    index * (count / count.min(1024))
                ))
            })
            .collect();

        group.bench_with_input(BenchmarkId::new("check_sender", count), &count, |b, _| {
            let mut next = 0;
            b.iter(|| {
                let key = &keys[next % keys.len()];
                next += 1;
                let block = senders.get(key).expect("tracked");
                black_box(check_block(block.as_ref(), Timestamp(1000), Mode::Enforce))
            });
        });

        group.bench_with_input(BenchmarkId::new("record_strike", count), &count, |b, _| {
            let mut next = 0i64;
            b.iter(|| {
                let key = &keys[(next as usize) % keys.len()];
                next += 1;
                let state = cache.get_mut(key).expect("tracked");
                let outcome = state.record_strike(
                    &settings,
                    Strike {
                        at: Timestamp(next * 1000),
                        verdict: "virus Eicar".into(),
                        message_id: "tx".into(),
                        header_message_id: None,
                    },
                );
                // Keep the state below the threshold so each iteration
                // measures the same work.
                state.strikes.clear();
                state.block = None;
                black_box(outcome)
            });
        });
    }
    group.finish();
}

fn identity(c: &mut Criterion) {
    let config = IdentityConfig::default();
    let mut group = c.benchmark_group("identity");
    group.bench_function("canonical_ascii", |b| {
        b.iter(|| {
            black_box(canonical_address(
                black_box("Alice.Smith+news@Example.ORG"),
                &config,
            ))
        })
    });
    group.bench_function("canonical_idna", |b| {
        b.iter(|| {
            black_box(canonical_address(
                black_box("alice@Bücher.example"),
                &config,
            ))
        })
    });
    group.finish();
}

criterion_group!(benches, policy, identity);
criterion_main!(benches);

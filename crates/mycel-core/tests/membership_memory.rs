//! The membership table's memory when strangers fill it, measured with a counting allocator
//! (what the table allocates on this thread): with the largest announcements peers accept
//! (until the table's 16 MiB of statements is reached) and with the most peers it lists
//! (10,000 small announcements). Issue 15 found a worst case of ~160 MiB before the table had
//! a byte bound; it must stay well below that.

mod counting;

use mycel_core::membership::{Config, Membership};
use mycel_core::statement::{
    Announcement, Capabilities, DatasetOffer, ModelKind, ModelOffer, SignedStatement, Statement,
    MAX_STATEMENT_BYTES,
};
use mycel_core::{id::ContentId, Keypair};

use counting::measured;

const MIB: usize = 1 << 20;
const NOW: u64 = 1_700_000_000_000;

fn announce(key: &Keypair, capabilities: Capabilities, addrs: Vec<String>) -> SignedStatement {
    SignedStatement::sign(
        key,
        &Statement::Announce(Announcement {
            seq: 1,
            issued_at: NOW,
            expires_at: NOW + 60_000,
            capabilities,
            addrs,
            reachability: Default::default(),
            relay: false,
            operator: None,
            full: false,
        }),
    )
}

/// As large an announcement as peers accept: 8 addresses of 256 bytes, models and datasets
/// with names of 128 bytes, up to the statement limit.
fn largest(key: &Keypair) -> SignedStatement {
    let addrs: Vec<String> = (0..8)
        .map(|i| format!("/dns4/{}/tcp/{i}", "a".repeat(240)))
        .collect();
    let mut n = 32;
    loop {
        let capabilities = Capabilities {
            models: (0..n)
                .map(|i| ModelOffer {
                    id: ContentId([i as u8; 32]),
                    name: format!("{i:0128}"),
                    kind: ModelKind::Generation,
                    engine: "e".repeat(128),
                })
                .collect(),
            datasets: (0..n)
                .map(|i| DatasetOffer {
                    tag: format!("{i:0128}"),
                    samples: u64::MAX,
                    digest: ContentId([i as u8; 32]),
                })
                .collect(),
            ..Default::default()
        };
        let signed = announce(key, capabilities, addrs.clone());
        if signed.body.len() <= MAX_STATEMENT_BYTES {
            assert!(signed.verify(NOW).is_ok(), "peers accept it");
            return signed;
        }
        n -= 1;
    }
}

#[test]
fn a_membership_table_filled_by_strangers_stays_well_under_its_worst_case() {
    let local = Keypair::generate_ed25519().public().to_peer_id();
    // The statements are made first: they are the senders' bytes, not the table's.
    let large: Vec<SignedStatement> = (0..1_500)
        .map(|_| largest(&Keypair::generate_ed25519()))
        .collect();
    let body = large[0].body.len();
    // Peers held, and the bytes the table holds, after it took in `statements`.
    let fill = |statements: &[SignedStatement]| {
        let (table, usage) = measured(|| {
            let mut table = Membership::new(local, Config::default());
            for signed in statements {
                let _ = table.on_statement(signed, NOW);
            }
            table
        });
        (table.peers().count(), usage.live)
    };
    let (held, used) = fill(&large);
    eprintln!(
        "largest announcements ({body} bytes each): {held} held in {:.1} MiB",
        used as f64 / MIB as f64
    );
    assert!(held >= 500, "the byte bound let in only {held}");
    assert!(held < 1_500, "the byte bound held nothing back");
    assert!(used < 48 * MIB, "{used} bytes");
    drop(large);

    let small: Vec<SignedStatement> = (0..12_000)
        .map(|_| {
            announce(
                &Keypair::generate_ed25519(),
                Capabilities::default(),
                Vec::new(),
            )
        })
        .collect();
    let (held, used) = fill(&small);
    eprintln!(
        "small announcements: {held} held in {:.1} MiB",
        used as f64 / MIB as f64
    );
    assert_eq!(held, Config::default().max_peers);
    assert!(used < 48 * MIB, "{used} bytes");
}

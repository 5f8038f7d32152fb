//! Encodings: openraft's entries and memberships round-trip through postcard, a log id can be
//! read from an entry's prefix, and snapshot data (bytes from another node) never panics the
//! decoder and round-trips.

use std::collections::{BTreeMap, BTreeSet};

use csv_core::meta::LockMode;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership, StoredMembership};
use proptest::prelude::*;

use super::support::Tally;
use crate::store::sm::{decode_snapshot, encode_snapshot};
use crate::types::{Command, Op, RaftNode, TypeConfig};

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::Tick),
        any::<u64>().prop_map(|session| Op::KeepAlive { session }),
        (any::<u64>(), ".{0,12}", any::<bool>()).prop_map(|(session, key, x)| Op::Acquire {
            session,
            key,
            mode: if x {
                LockMode::Exclusive
            } else {
                LockMode::Shared
            },
        }),
        (
            any::<u64>(),
            ".{0,8}",
            proptest::collection::vec(any::<u8>(), 0..32),
            0u32..3
        )
            .prop_map(|(ino, name, value, flags)| Op::SetXattr {
                ino,
                name,
                value,
                flags
            }),
    ]
}

fn arb_log_id() -> impl Strategy<Value = LogId<u64>> {
    (any::<u64>(), any::<u64>(), any::<u64>())
        .prop_map(|(t, n, i)| LogId::new(CommittedLeaderId::new(t, n), i))
}

fn arb_membership() -> impl Strategy<Value = Membership<u64, RaftNode>> {
    (
        proptest::collection::btree_set(0u64..16, 1..5),
        proptest::collection::btree_set(0u64..16, 0..5),
        proptest::option::of(proptest::collection::btree_set(0u64..16, 1..5)),
    )
        .prop_map(|(voters, learners, joint)| {
            let configs: Vec<BTreeSet<u64>> = joint.into_iter().chain([voters.clone()]).collect();
            let nodes: BTreeMap<u64, RaftNode> = configs
                .iter()
                .flatten()
                .chain(&learners)
                .map(|&id| {
                    (
                        id,
                        RaftNode {
                            rpc_addr: format!("10.0.0.{id}:7000"),
                        },
                    )
                })
                .collect();
            Membership::new(configs, nodes)
        })
}

fn arb_entry() -> impl Strategy<Value = Entry<TypeConfig>> {
    let payload = prop_oneof![
        Just(EntryPayload::Blank),
        (any::<u64>(), arb_op()).prop_map(|(now_ms, op)| EntryPayload::Normal(Command {
            now_ms,
            op,
            origin: None
        })),
        arb_membership().prop_map(EntryPayload::Membership),
    ];
    (arb_log_id(), payload).prop_map(|(log_id, payload)| Entry { log_id, payload })
}

proptest! {
    #[test]
    fn entries_round_trip_and_start_with_their_log_id(e in arb_entry()) {
        let bytes = postcard::to_allocvec(&e).unwrap();
        let back: Entry<TypeConfig> = postcard::from_bytes(&bytes).unwrap();
        prop_assert_eq!(&back, &e);
        let (prefix, _) = postcard::take_from_bytes::<LogId<u64>>(&bytes).unwrap();
        prop_assert_eq!(prefix, e.log_id);
    }

    #[test]
    fn snapshot_data_round_trips(
        count in any::<u64>(),
        digest in any::<u64>(),
        applied in proptest::option::of(arb_log_id()),
        mem_at in proptest::option::of(arb_log_id()),
        m in arb_membership(),
    ) {
        let data = Tally { count, digest };
        let membership = StoredMembership::new(mem_at, m);
        let bytes = encode_snapshot(&applied, &membership, &data).unwrap();
        let body = decode_snapshot::<Tally>(&bytes).unwrap();
        prop_assert_eq!(body.data, data);
        prop_assert_eq!(body.last_applied, applied);
        prop_assert_eq!(body.last_membership, membership);
        // Trailing garbage and truncation are refused.
        let mut longer = bytes.clone();
        longer.push(0);
        prop_assert!(decode_snapshot::<Tally>(&longer).is_err());
        prop_assert!(decode_snapshot::<Tally>(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn random_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_snapshot::<Tally>(&bytes);
        let _ = postcard::from_bytes::<Entry<TypeConfig>>(&bytes);
    }
}

//! Property tests for the wire codec: any event the server can produce decodes back to
//! itself, and both timestamp encodings decode to the same instant.

use digame_schemas::{ActivityEvent, Attributes, EventKind, EventTime};
use proptest::prelude::*;
use serde_json::value::RawValue;

fn opt_text() -> impl Strategy<Value = Option<String>> {
    proptest::option::of("[ -~]{0,40}|[\\u{80}-\\u{10FFFF}]{0,8}")
}

prop_compose! {
    fn attributes()(
        app in opt_text(), title in opt_text(), url in opt_text(), project in opt_text(),
        language in opt_text(), branch in opt_text(), file in opt_text(), status in opt_text(),
        participants in proptest::collection::vec("[a-z0-9]{1,12}", 0..4),
    ) -> Attributes {
        Attributes { app, title, url, project, language, branch, file, participants, status }
    }
}

prop_compose! {
    fn event()(
        id in any::<u128>(), tenant in "[a-z]{1,8}", user in "[ -~]{1,20}",
        source in "[a-z]{1,10}", kind in 0usize..EventKind::ALL.len(),
        ts in 0i64..253_402_300_799_999, received in proptest::option::of(0i64..4_000_000_000_000),
        duration in any::<u32>(), attributes in attributes(),
        props in proptest::option::of(proptest::collection::btree_map("[a-z]{1,6}", any::<i32>(), 0..3)),
    ) -> ActivityEvent {
        ActivityEvent {
            schema_version: 1,
            event_id: Some(uuid::Uuid::from_u128(id)),
            tenant_id: tenant,
            user_id: user,
            source,
            kind: EventKind::ALL[kind],
            timestamp: EventTime(ts),
            received_at: received.map(EventTime),
            duration_ms: u64::from(duration),
            attributes,
            properties: props.map(|m| RawValue::from_string(serde_json::to_string(&m).unwrap()).unwrap()),
        }
    }
}

proptest! {
    #[test]
    fn encode_then_decode_is_identity(ev in event()) {
        let text = serde_json::to_string(&ev).unwrap();
        let back: ActivityEvent = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(back, ev);
    }

    #[test]
    fn rfc3339_and_epoch_millis_agree(ms in 0i64..253_402_300_799_999) {
        let t = EventTime(ms);
        let from_text: EventTime = serde_json::from_str(&format!("\"{}\"", t.to_rfc3339())).unwrap();
        let from_num: EventTime = serde_json::from_str(&ms.to_string()).unwrap();
        prop_assert_eq!(from_text, t);
        prop_assert_eq!(from_num, t);
    }
}

//! `--experts` spec parsing and resolution against the tiny model.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use switchyard_expert_worker::{ExpertSpec, SpecError};

fn set(ids: &[u32]) -> BTreeSet<u32> {
    ids.iter().copied().collect()
}

#[test]
fn parses_the_three_forms() {
    assert_eq!("all".parse::<ExpertSpec>(), Ok(ExpertSpec::All));
    assert_eq!(" ALL ".parse::<ExpertSpec>(), Ok(ExpertSpec::All));
    assert_eq!("none".parse::<ExpertSpec>(), Ok(ExpertSpec::none()));
    assert_eq!("0-3,8".parse::<ExpertSpec>(), Ok(ExpertSpec::Every(set(&[0, 1, 2, 3, 8]))));
    assert_eq!("5".parse::<ExpertSpec>(), Ok(ExpertSpec::Every(set(&[5]))));
    assert_eq!("2-2, 7 ,1".parse::<ExpertSpec>(), Ok(ExpertSpec::Every(set(&[1, 2, 7]))));
    let per_layer = "1:0-3;3:4-7".parse::<ExpertSpec>();
    let expected = BTreeMap::from([(1, Some(set(&[0, 1, 2, 3]))), (3, Some(set(&[4, 5, 6, 7])))]);
    assert_eq!(per_layer, Ok(ExpertSpec::PerLayer(expected)));
    let with_all = "1:all; 3:0".parse::<ExpertSpec>();
    assert_eq!(with_all, Ok(ExpertSpec::PerLayer(BTreeMap::from([(1, None), (3, Some(set(&[0])))]))));
}

#[test]
fn display_round_trips() {
    for text in ["all", "none", "0-3,8", "1:0-3;3:4-7", "1:all;3:0,2,4-5"] {
        let spec: ExpertSpec = text.parse().expect(text);
        assert_eq!(spec.to_string(), text);
        assert_eq!(spec.to_string().parse::<ExpertSpec>().as_ref(), Ok(&spec));
    }
}

#[test]
fn syntax_errors_name_the_bad_part() {
    let cases = [
        ("", "\"\""),
        ("x", "\"x\""),
        ("0-x", "\"0-x\""),
        ("5-3", "reversed"),
        ("0,,1", "empty item"),
        ("0-3;4", "`;`"),
        ("1:0-3;3", "\"3\""),
        ("a:0", "layer number"),
        ("1:0;1:2", "second time"),
        ("1:", "empty item"),
        ("0-4000000000", "largest expert id"),
        ("-1", "\"-1\""),
    ];
    for (spec, needle) in cases {
        match spec.parse::<ExpertSpec>() {
            Err(error @ SpecError::Syntax { .. }) => {
                let message = error.to_string();
                assert!(message.contains(needle), "{spec:?}: {message}");
            }
            other => panic!("{spec:?} parsed as {other:?}"),
        }
    }
}

#[test]
fn resolves_against_the_model() {
    let dir = common::tiny_model();
    let text = common::text_config(dir.path());
    assert_eq!(text.moe_layers, vec![1, 3]);
    let every: BTreeSet<u32> = (0..8).collect();

    let all = "all".parse::<ExpertSpec>().unwrap().resolve(&text).unwrap();
    assert_eq!(all, BTreeMap::from([(1, every.clone()), (3, every.clone())]));
    let list = "0-1,6".parse::<ExpertSpec>().unwrap().resolve(&text).unwrap();
    assert_eq!(list, BTreeMap::from([(1, set(&[0, 1, 6])), (3, set(&[0, 1, 6]))]));
    let per_layer = "3:2-4".parse::<ExpertSpec>().unwrap().resolve(&text).unwrap();
    assert_eq!(per_layer, BTreeMap::from([(3, set(&[2, 3, 4]))]));
    let layer_all = "1:all".parse::<ExpertSpec>().unwrap().resolve(&text).unwrap();
    assert_eq!(layer_all, BTreeMap::from([(1, every)]));

    for (spec, needle) in
        [("0-8", "expert 8"), ("2:0", "layer 2 is not an MoE layer"), ("9:0", "layer 9"), ("3:7-9", "expert 8")]
    {
        match spec.parse::<ExpertSpec>().unwrap().resolve(&text) {
            Err(error @ SpecError::Model { .. }) => {
                let message = error.to_string();
                assert!(message.contains(needle), "{spec:?}: {message}");
            }
            other => panic!("{spec:?} resolved to {other:?}"),
        }
    }
}

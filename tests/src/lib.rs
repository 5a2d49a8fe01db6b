//! Cross-process integration tests of Switchyard.
//!
//! The tests in `tests/tests/` drive the real `switchyard` binary (built by Cargo for this package's tests) through
//! its command line and files. Golden parity fixtures generated with HuggingFace transformers live in
//! `tests/golden/`.

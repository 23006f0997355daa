//! See tests/*.rs: integration tests that need the built binaries and real peers.

//! `flotilla-proto`: the wire protocol between Flotilla processes.
//!
//! This crate will hold the `.proto` files (Raft peer service, cell session service, admin
//! service), the tonic/prost code generated from them at build time (with a vendored `protoc`,
//! so no system tool is needed), and the conversions between protobuf messages and the domain
//! types of `flotilla-core`. Domain crates never name prost types; they convert here, once.
//!
//! Status: empty until the Consensus issue adds the Raft service.

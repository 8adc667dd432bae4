//! Whom a device trusts, and how a signed document is checked: Ed25519
//! keys, signed envelopes (k-of-n, domain-separated), the trust root and
//! its rotation. Pure apart from reading key files; knows nothing of
//! releases, transports or the node.

pub mod keys;
pub mod root;
pub mod signed;

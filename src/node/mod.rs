//! The release_handler driver: beamup as a hidden Erlang node. The
//! distribution protocol and term codec (`dist`), typed calls with pure
//! reply decoders (`calls`), and the managed node as the engine sees it:
//! a reconnecting link, what runs, start and stop (`link`).

pub mod calls;
pub mod dist;
pub(crate) mod link;

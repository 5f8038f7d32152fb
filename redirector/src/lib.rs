//! redirector
pub mod frame;

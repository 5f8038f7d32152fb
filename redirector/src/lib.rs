//! redirector

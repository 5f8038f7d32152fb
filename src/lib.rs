//! csvd

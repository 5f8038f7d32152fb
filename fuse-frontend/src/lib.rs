//! fuse-frontend

//! Capture-kernel reservation, image parsing and purgatory digests.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

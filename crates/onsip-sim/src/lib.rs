//! OnSIP simulator (being written).

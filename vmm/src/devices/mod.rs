//! Devices the VMM emulates itself (everything else is a vhost-user daemon).

pub mod legacy;

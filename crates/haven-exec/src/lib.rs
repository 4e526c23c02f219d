//! Running things on a node: OCF / LSB / systemd resource agents, fence agents,
//! supervised processes and QEMU guests over QMP.

//! Haven's high-availability state machines: the coordinator (failure detection,
//! fencing sequence, plan dispatch) and the node agent. Pure: time is an input.

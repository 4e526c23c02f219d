//! Haven's cluster model: the configuration (nodes, resources, constraints, fencing,
//! options), the observed state, their validation, and Pacemaker CIB import.
//!
//! Pure: no clock, socket, file or process. Parsing takes text and a source name so
//! errors can name the file.

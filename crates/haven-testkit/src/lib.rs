//! Fixtures that more than one test crate needs. Test-only: a dev-dependency, never
//! linked into the binary. Fixtures panic on setup failure, as tests should.

pub mod bmc;

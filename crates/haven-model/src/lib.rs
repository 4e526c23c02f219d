//! Haven's cluster model: the configuration (nodes, resources, constraints, fencing,
//! options), the observed state, their validation, and Pacemaker CIB import.
//!
//! Pure: no clock, socket, file or process. Parsing takes text and a source name so
//! errors can name the file.
//!
//! Entry points (stable; the daemon, the coordinator and the CLI call them):
//! - [`Config::from_toml`]`(source, text)` parses and validates a configuration,
//!   [`Config::to_toml`] renders one, [`Config::validate`] checks one built in code;
//! - [`State::from_json`]`(source, text)` parses observed state;
//! - [`cib::import`]`(source, xml)` converts a Pacemaker CIB into both, listing what it
//!   could not express;
//! - [`edit::render_preserving`] writes an edited configuration back into the
//!   operator's text, keeping comments and layout;
//! - [`Score`] carries Pacemaker's saturating ±INFINITY arithmetic.

pub mod cib;
pub mod config;
pub mod edit;
pub mod score;
pub mod state;

pub use config::{
    Action, BoolOp, Clone, Colocation, Config, ConfigError, Constraints, Expr, ExprOp, FenceDevice,
    FenceLevel, Fencing, Group, HealthStrategy, IdKind, Location, Meta, MultipleActive,
    NoQuorumPolicy, Node, OnFail, Op, Options, Order, OrderKind, PlacementStrategy, Primitive,
    ResourceSet, Role, Rule, ValueType,
};
pub use score::{INFINITY, Score, ScoreError};
pub use state::{
    DefinitionChange, Migration, NodeState, NodeStatus, ResourceStatus, State, StateError,
};

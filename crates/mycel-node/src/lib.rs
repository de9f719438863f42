//! mycel-node

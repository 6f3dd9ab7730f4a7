//! The tgc command-line tool: train, eval, predict, cache, info, similarity
fn main() {}

"""Grammar-constrained decoding: JSON schemas, regexes, choices and forced tool calls, enforced by a token mask."""

"""eval: closed-loop evaluation in real simulators (LIBERO)."""

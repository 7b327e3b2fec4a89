"""Code generators, one module per strategy (see DESIGN.md section 4)."""

"""Node executables (one module per node, each with ``main``)."""

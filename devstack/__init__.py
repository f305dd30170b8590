"""The development stack: everything that runs sluice on one machine for the demo, the tests and
the benchmarks, and nothing a deployment needs (the runtime is sluice/, tasks/, bridge/)."""

"""m2m-bench: benchmark harnesses, the digits demo and its data.

Not part of the m2m library: installed from a source checkout with ``pip install -e ./benchmarks``.
``m2m bench`` and ``m2m demo`` import it lazily.
"""

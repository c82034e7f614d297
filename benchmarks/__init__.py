"""mner-bench's performance benchmarks (pytest-benchmark); see BENCHMARKS.md."""

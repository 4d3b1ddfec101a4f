"""Build and CI helpers (shell scripts, and the pytest plugin ci_strict_skips that .ci/run loads)."""

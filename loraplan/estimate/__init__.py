"""The analytical estimator: pure Python, no torch. See ``api.estimate``."""

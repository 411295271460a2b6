"""Public test helpers: model builders and numeric/structural assertions."""

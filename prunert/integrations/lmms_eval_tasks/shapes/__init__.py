"""The lmms-eval task over prunert eval records: `_default_template_yaml` (settings) and `utils` (its functions)."""

"""prunert: export, compile and run vision-language models with static-budget visual-token pruning.

Importing this package is cheap: it pulls in neither numpy, torch nor transformers.
"""

__version__ = "0.1.0"

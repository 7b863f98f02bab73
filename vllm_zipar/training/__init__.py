"""Training the project's small demo model (issue 8): data, VQ tokenizer, LlamaGen GPT, digit classifier.

Nothing here is imported by the serving path; it needs the ``demo`` extra (scikit-learn for the data set,
matplotlib for plots) and is run by ``make train-demo`` (``python -m vllm_zipar.training.train_demo``).
"""

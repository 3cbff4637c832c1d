"""The no-tuning end of the spectrum: hard prompts, in-context learning, retrieval, kNN, and RAG prompting.

data/templates.py (template + verbalizer) -> prompts.py (few-shot prompt fitted to the context window) ->
scoring.py (label-word log-probabilities, shared-prefix K/V cache) -> icl.py; encoder.py + chunking.py
-> index.py (persistent FAISS index) -> knn.py, ask.py (`deltatune index`, `deltatune ask`);
job.py runs them like tuned methods. The templates and the PET head (deltatune/label_head.py,
`--objective verbalizer`) live below: the tuned path uses them too.
"""

"""Training objectives: what is hidden from the model and how its predictions are scored.

`masking.py`: BERT masking (token, whole-word, span) as a pure function of a PRNG key and the ids, in-graph.
`mlm.py`: the masked-LM objective: the masking function of a run (`make_mask_fn`, with its static prediction
budget), the loss at the masked positions, summed metrics. A new objective (or a fine-tuning task's loss) is a
module here with the same shape: a loss returning (value, summed metrics) over a batch.
"""

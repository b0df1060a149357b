"""Evaluation a retrieval person recognises (`grc eval`): BEIR-format test sets, ranking metrics
(ir_measures), compression, kept generation and RAG figures of one model; above `infer`, since it
drives the engine."""

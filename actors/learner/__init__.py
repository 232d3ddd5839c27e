"""The DPO learner: ``group.LearnerGroup`` drives N ``worker.LearnerWorker`` Ray actors, each
holding one data-parallel rank (``rank.Learner``) joined by torch.distributed. ``rank``,
``batching``, ``loss`` and the rest import no Ray, so tests and benches use them in a plain process.
"""

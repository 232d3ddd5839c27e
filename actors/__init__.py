"""Ray actors: vLLM generators, judge hosts, the learner group, and weight sync."""

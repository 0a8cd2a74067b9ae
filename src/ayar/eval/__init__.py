"""Evaluation: did the tuned model get better, at what cost, and did it break anything?"""

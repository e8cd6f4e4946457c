"""Reusable tensor algorithms with no paper names. Every function is batched over a leading ``B`` dimension."""

"""One readable file per algorithm: ``ppo`` (token-level GAE), ``reinforce`` (REINFORCE, RLOO)."""

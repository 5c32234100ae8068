"""Will it fit: memory per GPU from the config, model facts counted or built, the automatic token budget."""

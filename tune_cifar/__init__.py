"""tune-cifar: a distributed hyperparameter study of CIFAR-10 CNNs."""

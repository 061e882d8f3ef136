"""The federated round loop and its parts."""

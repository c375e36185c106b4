"""The ground floor: what every package may import (configuration types, metrics, the due-loop, log
redaction, connection limits, private files). It imports no other package of plunkd."""

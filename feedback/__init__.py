"""Delivery feedback: SES notifications through SNS (intake, verification, effects) and smarthost bounces."""

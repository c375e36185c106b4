"""What happens after an email is sent or an event recorded: SES delivery feedback through SNS (intake,
verification, effects), smarthost bounces, and outbound webhooks (`webhooks`)."""

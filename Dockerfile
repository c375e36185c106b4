FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY core core
COPY plunkd plunkd
COPY api api
COPY pipeline pipeline
COPY storage storage
COPY delivery delivery
COPY relay relay
COPY maintenance maintenance
COPY marketing marketing
COPY automation automation
COPY feedback feedback
COPY webhooks webhooks
COPY dashboard dashboard
COPY inbound inbound
COPY domaincheck domaincheck
RUN pip install --no-cache-dir .
ENV PLUNKD_SERVER_HOST=0.0.0.0 PLUNKD_SMTP_HOST=0.0.0.0 PLUNKD_SERVER_DATA_DIR=/data
VOLUME /data
EXPOSE 8080 465 587
CMD ["plunkd", "serve"]
